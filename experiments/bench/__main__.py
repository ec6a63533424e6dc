"""`python -m experiments.bench`: the bench's command line (experiments.bench.cli)."""
from experiments.bench.cli import main

if __name__ == "__main__":
    main()
