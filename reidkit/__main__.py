from reidkit.cli import main

raise SystemExit(main())
