"""Routing: a model alias to a pool of deployments, ordered and failed over, their health
watched, and the state replicas share."""
