from mode_cli.cli import main

raise SystemExit(main())
