from mpoe.train.main import cli

cli()
