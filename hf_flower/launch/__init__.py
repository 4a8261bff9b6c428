"""The only code that starts processes; it stops every process it starts."""
