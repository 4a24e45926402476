from fedfm.cli import app

app()
