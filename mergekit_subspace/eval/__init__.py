"""Task evaluators that load written PEFT folders through PEFT, as a user would."""
