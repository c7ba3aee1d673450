from blockdiff_demo.job import main

main()
