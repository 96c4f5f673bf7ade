import sys

from replay_server.cli import main

sys.exit(main())
