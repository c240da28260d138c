#!/usr/bin/env python3
"""Regenerate hintens/wire/_crc16.h from _crc16.h.in: fills in the tables computed by
gen_consts.py and the two dispatch thresholds.
Usage (from anywhere): python3 tools/crc16/build_header.py [PCLMUL_MIN [VPCLMUL_MIN [VPCLMUL512_MIN]]]"""
import os
import subprocess
import sys

here = os.path.dirname(os.path.abspath(__file__))
os.chdir(here)

pcl, vpcl, vpcl512 = (sys.argv[1:4] + ["32", "128", "512"][len(sys.argv[1:4]):])[:3]


tables = subprocess.run([sys.executable, "gen_consts.py", "--tables"], capture_output=True, text=True,
                        check=True).stdout
src = open("_crc16.h.in").read()
src = (src.replace("@TABLES@", tables)
          .replace("@PCLMUL_MIN@", pcl).replace("@VPCLMUL_MIN@", vpcl)
          .replace("@VPCLMUL512_MIN@", vpcl512))
open(os.path.join(here, "..", "..", "hintens", "wire", "_crc16.h"), "w").write(src)
