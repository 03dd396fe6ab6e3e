"""The request path: admit a request through the policies, route it, generate, account for it
(and reload the config under load). Nothing here knows the web framework."""
