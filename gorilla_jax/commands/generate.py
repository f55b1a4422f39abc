"""`gorilla-jax generate`: complete one prompt with a model from an HF directory or checkpoint."""
from __future__ import annotations

import json

from gorilla_jax.commands import add_cache_windows_argument


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate text from a prompt",
        description="Load a model (HF directory or gorilla-jax checkpoint), encode --prompt, "
        "generate up to --max-new-tokens with the KV cache (greedy by default, or temperature / "
        "top-p sampling with a seed) and print the new text, or JSON with --json.",
    )
    p.add_argument("--model", required=True, help="HF model directory or params checkpoint")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer file or directory (default: the model directory's own)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt as a user message in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="greedy decoding (the default)")
    mode.add_argument("--temperature", type=float, default=None, help="sampling temperature (> 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="parameter dtype (default: float32 for HF dirs, as stored for checkpoints)")
    p.add_argument("--json", action="store_true",
                   help="print JSON with token_ids (the new tokens) and text")
    add_cache_windows_argument(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    from gorilla_jax.errors import GorillaError
    from gorilla_jax.generate import generate
    from gorilla_jax.loading import default_tokenizer_path, load_model, model_eos_ids
    from gorilla_jax.tokenizer import load_tokenizer

    if args.max_new_tokens <= 0:
        raise GorillaError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if args.temperature is not None and args.temperature < 0:
        raise GorillaError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0.0 < args.top_p <= 1.0:
        raise GorillaError(f"--top-p must be in (0, 1], got {args.top_p}")
    tok_path = args.tokenizer or default_tokenizer_path(args.model)
    if tok_path is None:
        raise GorillaError(f"{args.model}: has no tokenizer files; pass --tokenizer")
    tokenizer = load_tokenizer(tok_path)
    config, params = load_model(args.model, dtype=args.dtype)
    if tokenizer.vocab_size > config.vocab_size:
        raise GorillaError(f"{tok_path}: tokenizer vocabulary ({tokenizer.vocab_size}) is larger "
                           f"than the model's ({config.vocab_size}): wrong tokenizer?")
    if args.chat:
        prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                                   add_generation_prompt=True, tokenize=True)
    else:
        prompt_ids = tokenizer.encode(args.prompt)
    eos_ids = [i for i in [tokenizer.eos_id, *model_eos_ids(args.model)] if i is not None]
    temperature = args.temperature or 0.0
    new = generate(params, config, [prompt_ids], args.max_new_tokens,
                   eos_ids=tuple(dict.fromkeys(eos_ids)), temperature=temperature,
                   top_p=args.top_p, seed=args.seed, pad_id=tokenizer.pad_id,
                   cache_windows=args.cache_windows)[0]
    text = tokenizer.decode(new)
    if args.json:
        print(json.dumps({"token_ids": [int(i) for i in new], "text": text,
                          "prompt_token_ids": [int(i) for i in prompt_ids],
                          "sampling": "greedy" if temperature == 0 else
                          {"temperature": temperature, "top_p": args.top_p, "seed": args.seed}},
                         ensure_ascii=False))
    else:
        print(text)
    return 0
