# Signal handlers first, before the imports of the command line: Ctrl-C at any moment is one line, exit 130.
import sys

from ovsd3.atomic import Interrupts, exit_code_of

with Interrupts():
    try:
        from ovsd3.cli import main

        code = main()
    except KeyboardInterrupt as stop:  # while importing the command line, or as main returned
        print("ovsd3: interrupted", file=sys.stderr)
        code = exit_code_of(stop)
raise SystemExit(code)
