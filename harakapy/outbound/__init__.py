"""The outbound half: the queue runner, MX resolution, one delivery attempt, bounces."""
