from ovsd3.cli import main

raise SystemExit(main())
