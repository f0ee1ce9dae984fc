import os

from cli.main import app

if __name__ == "__main__":  # decode worker processes import the main module; they must not run the CLI
    if "RANK" in os.environ:  # a rank torchrun's agent started (train, autotune): never outlive the agent
        from common.parent_death import die_with_parent

        die_with_parent()
    app(prog_name="vpmoe")
