import sys

from gateway.cli import main

if __name__ == "__main__":  # not when a spawned worker process imports it (impact previews)
    sys.exit(main())
