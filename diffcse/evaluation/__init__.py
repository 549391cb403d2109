"""`diffcse eval`: SentEval (via the independent `senteval_runner` package) on any model folder."""
