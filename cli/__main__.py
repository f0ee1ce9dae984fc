from cli.main import app

if __name__ == "__main__":  # decode worker processes import the main module; they must not run the CLI
    app(prog_name="vpmoe")
