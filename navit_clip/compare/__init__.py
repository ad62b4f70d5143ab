"""`navit-clip compare`: several training recipes on the same shards at the same budget, evaluated
zero-shot with the same code, written as a table, a CSV and plots."""
