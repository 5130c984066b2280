"""The command-line entry points and the one settings mechanism they share."""
