import sys

if __name__ == "__main__":  # not when a worker process imports it (multiprocessing spawn)
    from gateway.cli import main

    sys.exit(main())
