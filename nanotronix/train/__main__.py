from nanotronix.python_check import require_project_packages

require_project_packages()  # before main's imports: a Python without torch & co. says so in one line

from nanotronix.train.main import main  # noqa: E402

main()
