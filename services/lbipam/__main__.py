from services.lbipam.main import main

main()
