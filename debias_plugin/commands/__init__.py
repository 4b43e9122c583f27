"""Click commands, one module per stage; each imports its heavy dependencies inside the command."""
