from chute.cli import main

raise SystemExit(main())
