"""TLS: contexts for our listeners, and (with the policy issue) outbound verification."""
