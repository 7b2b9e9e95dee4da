from par.app.cli import run

run()
