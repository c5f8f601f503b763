from rlaifv.cli.main import app

app()
