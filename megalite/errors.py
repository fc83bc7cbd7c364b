"""The one exception type users see.

A MegaliteError carries one line that names the problem and the fix. Entry points
(`python -m megalite.train`, the tools) print it as `error: ...` and exit non-zero;
a traceback is shown only with `--debug`.
"""

import sys


class MegaliteError(Exception):
    """A user-facing error: one line naming the problem and how to fix it."""


def run_main(main, argv=None):
    """Run `main(argv)`; turn a MegaliteError into one line on stderr and exit code 1."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        return main(argv)
    except MegaliteError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
