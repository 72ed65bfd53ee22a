from services.l7proxy.main import main

main()
