try:
    from convert.preflight import exit_process

    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while Python is still starting up: one line, like any other moment
    import os
    import sys

    print("error: interrupted", file=sys.stderr, flush=True)
    os._exit(130)

exit_process(main(prog="python -m convert"))
