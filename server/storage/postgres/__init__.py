"""The PostgreSQL engine: the store, its schema and its migrations (asyncpg)."""
