"""OpenAI's Files and Vector Stores APIs over `app.knowledge`."""
