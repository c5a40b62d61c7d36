"""The routed experts of one MoE layer in float64, the reference the MoE tests and benchmarks compare with.

``out[t] = sum_k weights[t, k] * down[e] @ (silu(gate[e] @ x[t]) * (up[e] @ x[t]))``, ``e = ids[t, k]``:
what ktransformers' CPU backend (``cpuinfer_ext``'s ``MOE::forward``) and ``ktlegacy_runtime.routed_experts``
compute. ``gate``/``up``: (experts, intermediate, hidden), ``down``: (experts, hidden, intermediate),
any float dtype (torch is imported when called: the ``testing`` extra's users have it).
"""

from __future__ import annotations


def moe_reference(x, ids, weights, gate, up, down):
    """(tokens, hidden) float64: the layer's routed-expert output for ``x`` (tokens, hidden)."""
    import torch
    out = torch.zeros((x.shape[0], down.shape[1]), dtype=torch.float64)
    for t in range(x.shape[0]):
        xt = x[t].double()
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            h = torch.nn.functional.silu(gate[e].double() @ xt) * (up[e].double() @ xt)
            out[t] += float(weights[t, k]) * (down[e].double() @ h)
    return out
