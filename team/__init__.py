"""Team mode: PostgreSQL + OpenStack Swift (S3 API) + `mlflow server` with basic-auth, one command up and down.

    python -m team up       # start (first run: generates team/.env with random passwords), prints the variables to set
    python -m team down     # stop every process it started
    python -m team env      # print the variables a teammate sets (tracking URI, user, password)
    python -m team status   # which processes are up

Settings are environment variables (TEAM_*), read from the environment first and then from
team/.env (git-ignored; TEAM_ENV_FILE names another file). See team/stack.py for the list.
"""
