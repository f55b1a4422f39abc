"""`gorilla-jax serve`: an OpenAI-compatible HTTP server over the JAX generator."""
from __future__ import annotations

from gorilla_jax.commands import add_cache_windows_argument


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve /v1/completions, /v1/chat/completions (both with streaming) and "
        "/v1/models for a converted checkpoint or HF directory. Concurrent requests are batched "
        "through the KV-cache generator; bad requests get a 4xx with a message; a prompt that "
        "does not fit the context is rejected, never truncated.")
    p.add_argument("--model", required=True, help="HF model directory or params checkpoint")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer file or directory (default: the model directory's own)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    p.add_argument("--model-id", default=None, help="model name in the API (default: the directory name)")
    p.add_argument("--max-batch", type=int, default=8, help="requests generated together (default 8)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0,
                   help="how long to wait for more requests before a batch starts (default 10)")
    p.add_argument("--stream-tokens", type=int, default=16,
                   help="tokens per round while a request streams (default 16)")
    p.add_argument("--max-context", type=int, default=None,
                   help="context length: prompt + max_tokens (default: the model's max_position_embeddings)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="parameter dtype (default: float32 for HF dirs, as stored for checkpoints)")
    add_cache_windows_argument(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    import logging

    from gorilla_jax.serve import GorillaServer, load_backend

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    backend = load_backend(args.model, args.tokenizer, model_id=args.model_id, dtype=args.dtype,
                           max_context=args.max_context, cache_windows=args.cache_windows)
    server = GorillaServer(backend, args.host, args.port, max_batch=args.max_batch,
                           batch_wait=args.batch_wait_ms / 1000.0, stream_tokens=args.stream_tokens)
    print(f"serving {backend.model_id} at {server.url} (context {backend.max_context} tokens, "
          f"batches of up to {args.max_batch}); Ctrl-C to stop", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    return 0
