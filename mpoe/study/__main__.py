from mpoe.study.cli import cli

cli()
