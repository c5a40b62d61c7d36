"""Serve overlays/server_api's API from a patched upstream tree on CPU (tests/test_server_api.py).

    python tests/server_api_app.py serve --tree PATCHED_TREE --model HF_DIR --port P [--cache-lens N]
    python tests/server_api_app.py make-model --model HF_DIR
    python tests/server_api_app.py reference --model HF_DIR --requests JSON   # prints greedy token ids

Runs in a venv with ktransformers 0.2.1.post1's Python requirements. The backend is upstream's
own ``TransformersInterface`` (the plain Hugging Face backend of the same server; the GPU
backend ``KTransformersInterface`` subclasses it and is driven the same way) on CPU; the app is
FastAPI + uvicorn as in upstream's main.py, with ``ktlegacy_api.install`` as the patched main.py
calls it. Upstream's own router is not mounted: importing it imports the CUDA backend.

The model is a small random Llama with ktlegacy's test tokenizer and chat template; the
reference recomputes the whole sequence at each step in fp32 (no cache), sharing no code with
the server's cached decode.
"""

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def make_model(model: Path) -> None:
    sys.path.insert(0, str(REPO))
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from ktlegacy.testing.testmodel import BOS, CHAT_TEMPLATE, EOS, TestModelSpec, build_tokenizer
    model.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(TestModelSpec())
    tok.save(str(model / "tokenizer.json"))
    (model / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": EOS,
        "add_bos_token": True, "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False}))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                      bos_token_id=tok.token_to_id(BOS), eos_token_id=tok.token_to_id(EOS),
                      tie_word_embeddings=False)
    net = LlamaForCausalLM(cfg)
    with torch.no_grad():  # logits with a clear winner per step: argmax is stable across code paths
        net.lm_head.weight.mul_(40.0)
    net.save_pretrained(str(model), safe_serialization=True)


def reference(model: Path, requests: list[dict]) -> list[list[int]]:
    """Greedy tokens (end of sequence excluded) for each {"ids": [...], "max_tokens": n}."""
    import torch
    from transformers import AutoModelForCausalLM
    net = AutoModelForCausalLM.from_pretrained(str(model), torch_dtype=torch.float32).eval()
    eos = net.config.eos_token_id
    out = []
    for req in requests:
        ids, tokens = list(req["ids"]), []
        with torch.no_grad():
            while len(tokens) < req["max_tokens"]:
                token = int(net(torch.tensor([ids])).logits[0, -1].argmax())
                if token == eos:
                    break
                tokens.append(token)
                ids.append(token)
        out.append(tokens)
    return out


def serve(args) -> None:
    sys.path.insert(0, args.tree)
    import importlib.util
    import torch
    import uvicorn
    from fastapi import FastAPI
    from ktransformers.server.config.config import Config
    from ktransformers.server.backend.interfaces.transformers import TransformersInterface
    # by file: importing the package ktransformers.server.api imports upstream's routers, and
    # with them the CUDA backend
    path = Path(args.tree) / "ktransformers" / "server" / "api" / "ktlegacy_api.py"
    spec = importlib.util.spec_from_file_location("ktlegacy_api", path)
    ktlegacy_api = importlib.util.module_from_spec(spec)
    sys.modules["ktlegacy_api"] = ktlegacy_api
    spec.loader.exec_module(ktlegacy_api)

    torch.manual_seed(0)
    cfg = Config()
    cfg.model_dir = cfg.model_path = args.model
    cfg.model_name = args.name
    cfg.gguf_path = args.model
    cfg.device = "cpu"
    cfg.cache_lens = args.cache_lens
    cfg.max_new_tokens = args.max_new_tokens
    cfg.batch_size = 1
    interface = TransformersInterface(cfg)
    if args.token_delay:
        # a tiny model on a CPU decodes in a few ms; a real one takes ~20-200 ms per token, which
        # is what makes a disconnect or a queue observable mid-generation
        decode = interface.decode_one_tokens

        def slow_decode():
            time.sleep(args.token_delay)
            return decode()
        interface.decode_one_tokens = slow_decode
    ktlegacy_api.set_interface(interface)
    app = FastAPI()
    ktlegacy_api.install(app)
    print("ktlegacy test server: model loaded", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="info")


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--tree", required=True)
    s.add_argument("--model", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--name", default="ktlegacy-test")
    s.add_argument("--cache-lens", type=int, default=256)
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--token-delay", type=float, default=0.0, help="seconds added to each decode step")
    m = sub.add_parser("make-model")
    m.add_argument("--model", required=True, type=Path)
    r = sub.add_parser("reference")
    r.add_argument("--model", required=True, type=Path)
    r.add_argument("--requests", required=True)
    args = p.parse_args()
    if args.cmd == "serve":
        serve(args)
    elif args.cmd == "make-model":
        make_model(args.model)
    else:
        print(json.dumps(reference(args.model, json.loads(args.requests))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
