"""What a running process needs besides the model: threads, signals, fault injection, the console."""
