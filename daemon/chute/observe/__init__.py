"""What chute says: metrics, the HTTP endpoint, systemd notify, logs, reports."""
