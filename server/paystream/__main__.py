from paystream.cli import main

raise SystemExit(main())
