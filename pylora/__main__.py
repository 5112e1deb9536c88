import sys

from pylora.cli import main

sys.exit(main())
