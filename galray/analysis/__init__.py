"""Arrays in, figures out (matplotlib): class montages, training figures. Never imports Ray or MLflow."""
