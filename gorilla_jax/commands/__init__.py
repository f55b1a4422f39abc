"""One module per `gorilla-jax` subcommand. Each defines ``register(subparsers)``.

The CLI discovers the modules here; a module imports heavy libraries (jax, tensorflow, torch)
only inside its handler, so ``gorilla-jax --help`` stays fast.
"""


def add_cache_windows_argument(p) -> None:
    """``--cache-windows N`` for the commands that generate (gorilla_jax.generate.Generator)."""
    p.add_argument("--cache-windows", type=int, default=None, metavar="N",
                   help="grow the KV cache in N steps, so each decode step reads only the slots "
                        "allocated so far (default: 4 on CPU, 1 elsewhere; 1 allocates the whole "
                        "cache at once and compiles the decode once)")
