"""`python -m experiments.bench`: the bench's command line under the project's error policy (a user's mistake
is one line and exit status 2)."""
from experiments.bench.cli import main
from experiments.errors import guarded

if __name__ == "__main__":
    guarded(main)
