import sys

# Not when a worker process imports it (multiprocessing spawn: policy parsing, previews).
if __name__ == "__main__":
    from gateway.cli import main

    sys.exit(main())
