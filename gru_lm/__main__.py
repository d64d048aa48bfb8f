from gru_lm.cli import main

main()
