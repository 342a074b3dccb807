from nanotronix.train.main import main

main()
