"""Serve overlays/server_api's API from a patched upstream tree on CPU (tests/test_server_api.py).

    python tests/server_api_app.py serve --tree PATCHED_TREE --model HF_DIR --port P [--cache-lens N]
        [--load-delay S] [--script JSON]
    python tests/server_api_app.py make-model --model HF_DIR [--template default|deepseek-v3]
    python tests/server_api_app.py reference --model HF_DIR --requests JSON   # prints greedy token ids

Runs in a venv with ktransformers 0.2.1.post1's Python requirements. The backend is upstream's
own ``TransformersInterface`` (the plain Hugging Face backend of the same server; the GPU
backend ``KTransformersInterface`` subclasses it and is driven the same way) on CPU; the app is
FastAPI + uvicorn as in upstream's main.py, with ``ktlegacy_api.install`` as the patched main.py
calls it, and the model loaded as the patched main.py loads it: by ``load_in_background`` while
the server already answers ``/health``. The load first reads every tensor of the model's GGUF
through upstream's ``GGUFLoader`` (the patched one, whose ``get_mmap_tensor`` reports progress),
``--load-delay`` seconds each, so a test can watch the progress. Upstream's own router is not
mounted: importing it imports the CUDA backend. Settings (``KTLEGACY_API_KEY`` ...) come from the
environment, as in the image.

The model is a small random Llama with ktlegacy's test tokenizer and chat template, or
(``--template deepseek-v3``) DeepSeek-V3's chat template (tests/fixtures/deepseek_v3_chat_template.jinja,
the ``chat_template`` of DeepSeek-V3's tokenizer_config.json) with its tool-call tokens added to the
tokenizer as special tokens. The reference recomputes the whole sequence at each step in fp32
(no cache), sharing no code with the server's cached decode.

``--script FILE`` (tests only) forces what the model answers: a JSON list of
``{"when": TEXT, "reply": TEXT}`` or ``{"when": TEXT, "reply_ids": [...]}`` (``when`` may be a list
of texts that must all occur); the first rule whose ``when`` occurs in the decoded prompt (special tokens included) replaces each sampled token by the
reply's next token, then the end-of-sequence token. The model still runs its prefill and decode
steps; only the choice of token is forced. This is how the tool-call parser is fed the exact
bytes a DeepSeek model writes, which a random model never would.
"""

import argparse
import json
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEEPSEEK_V3_TEMPLATE = REPO / "tests" / "fixtures" / "deepseek_v3_chat_template.jinja"
# DeepSeek-V3's tokens its chat template writes (added to the test tokenizer for --template deepseek-v3)
DEEPSEEK_TOKENS = ["<｜User｜>", "<｜Assistant｜>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>",
                   "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>", "<｜tool▁outputs▁begin｜>",
                   "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"]


def make_model(model: Path, template: str = "default") -> None:
    sys.path.insert(0, str(REPO))
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from ktlegacy.testing.testmodel import BOS, CHAT_TEMPLATE, EOS, TestModelSpec, build_tokenizer
    model.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(TestModelSpec())
    chat_template = CHAT_TEMPLATE
    if template == "deepseek-v3":
        tok.add_special_tokens(DEEPSEEK_TOKENS)
        chat_template = DEEPSEEK_V3_TEMPLATE.read_text(encoding="utf-8")
    tok.save(str(model / "tokenizer.json"))
    (model / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": EOS,
        "add_bos_token": True, "chat_template": chat_template, "clean_up_tokenization_spaces": False}))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32768,
                      bos_token_id=tok.token_to_id(BOS), eos_token_id=tok.token_to_id(EOS),
                      tie_word_embeddings=False)
    net = LlamaForCausalLM(cfg)
    with torch.no_grad():  # logits with a clear winner per step: argmax is stable across code paths
        net.lm_head.weight.mul_(40.0)
    net.save_pretrained(str(model), safe_serialization=True)
    # the same weights as a GGUF: what the server's load reads through upstream's GGUFLoader
    import gguf
    writer = gguf.GGUFWriter(str(model / "model.gguf"), "llama")
    for name, tensor in net.state_dict().items():
        writer.add_tensor(name, tensor.detach().float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


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


def force_replies(ktlegacy_api, rules: list[dict]) -> None:
    """--script: the first rule whose "when" is in the decoded prompt picks every token."""
    generate = ktlegacy_api.Engine.generate

    def scripted(self, ids, sampler, cancel):
        prompt = self.tokenizer.decode(ids, skip_special_tokens=False)
        rule = next((r for r in rules if all(w in prompt for w in (
            r["when"] if isinstance(r["when"], list) else [r["when"]]))), None)
        if rule is None:
            yield from generate(self, ids, sampler, cancel)
            return
        reply = rule.get("reply_ids")
        if reply is None:
            reply = self.tokenizer.encode(rule["reply"], add_special_tokens=False)
        forced = iter(list(reply) + [min(self.eos_ids)])

        def sample(logits):
            sampler(logits)  # the request's sampler still runs on the real logits
            return next(forced, min(self.eos_ids))
        yield from generate(self, ids, sample, cancel)
    ktlegacy_api.Engine.generate = scripted


def serve(args) -> None:
    sys.path.insert(0, args.tree)
    # upstream's custom_gguf imports its CUDA extension for the GPU dequantizers; the CPU path
    # (what this loader uses) does not call it
    sys.modules.setdefault("KTransformersOps", types.ModuleType("KTransformersOps"))
    import importlib.util
    import torch
    import uvicorn
    from fastapi import FastAPI
    from ktransformers.server.config.config import Config
    from ktransformers.server.backend.interfaces.transformers import TransformersInterface
    from ktransformers.util.custom_gguf import GGUFLoader
    # by file: importing the package ktransformers.server.api imports upstream's routers, and
    # with them the CUDA backend
    path = Path(args.tree) / "ktransformers" / "server" / "api" / "ktlegacy_api.py"
    spec = importlib.util.spec_from_file_location("ktlegacy_api", path)
    ktlegacy_api = importlib.util.module_from_spec(spec)
    sys.modules["ktlegacy_api"] = ktlegacy_api
    spec.loader.exec_module(ktlegacy_api)
    if args.script:
        force_replies(ktlegacy_api, json.loads(Path(args.script).read_text(encoding="utf-8")))

    torch.manual_seed(0)
    cfg = Config()
    cfg.model_dir = cfg.model_path = args.model
    cfg.model_name = args.name
    cfg.gguf_path = args.model
    cfg.device = "cpu"
    cfg.cache_lens = args.cache_lens
    cfg.max_new_tokens = args.max_new_tokens
    cfg.batch_size = 1

    def load():
        loader = GGUFLoader(args.model)
        for name in loader.tensor_info:
            loader.load_gguf_tensor(name, "cpu")
            time.sleep(args.load_delay)
        interface = TransformersInterface(cfg)
        if args.token_delay:
            # a tiny model on a CPU decodes in a few ms; a real one takes ~20-200 ms per token, which
            # is what makes a disconnect or a queue observable mid-generation
            decode = interface.decode_one_tokens

            def slow_decode():
                time.sleep(args.token_delay)
                return decode()
            interface.decode_one_tokens = slow_decode
        print("ktlegacy test server: model loaded", flush=True)
        return interface

    app = FastAPI()
    ktlegacy_api.install(app)
    ktlegacy_api.load_in_background(load)
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
    s.add_argument("--load-delay", type=float, default=0.0, help="seconds added per GGUF tensor loaded")
    s.add_argument("--script", default=None, help="JSON file of forced replies (see the docstring)")
    m = sub.add_parser("make-model")
    m.add_argument("--model", required=True, type=Path)
    m.add_argument("--template", choices=("default", "deepseek-v3"), default="default")
    r = sub.add_parser("reference")
    r.add_argument("--model", required=True, type=Path)
    r.add_argument("--requests", required=True)
    args = p.parse_args()
    if args.cmd == "serve":
        serve(args)
    elif args.cmd == "make-model":
        make_model(args.model, args.template)
    else:
        print(json.dumps(reference(args.model, json.loads(args.requests))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
