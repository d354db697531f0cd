"""Team mode: PostgreSQL + OpenStack Swift (S3 API) + `mlflow server` with basic-auth, one command up and down.

    mnistgen team up       # start (first run: generates ~/.config/mnistgen/team.env with random passwords)
    mnistgen team down     # stop every process it started
    mnistgen team env      # print the variables a teammate sets (tracking URI, user, password)
    mnistgen team status   # which processes are up

Settings are environment variables (TEAM_*), read from the environment first and then from
~/.config/mnistgen/team.env (git-ignored; TEAM_ENV_FILE names another file). mnistgen/team/settings.py lists them.
"""
