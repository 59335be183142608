pytest_plugins = ["tests.servers", "tests.live"]
