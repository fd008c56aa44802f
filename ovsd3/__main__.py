# Signal handlers first, before the imports of the command line: Ctrl-C at any moment is one line, exit 130.
import sys

from ovsd3.atomic import Interrupts, exit_code_of, interrupted_line

with Interrupts():
    try:
        from ovsd3.cli import main

        code = main()
    except KeyboardInterrupt as stop:  # while importing the command line, or as main returned
        # the command is the first word that is not an option (ovsd3's own options are --help and --version)
        print(interrupted_line(next((word for word in sys.argv[1:] if not word.startswith("-")), None), stop),
              file=sys.stderr)
        code = exit_code_of(stop)
raise SystemExit(code)
