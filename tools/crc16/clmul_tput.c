/* Micro-benchmark: reciprocal throughput of (V)PCLMULQDQ vs VPXOR/VPMULLW on
 * this CPU; shows the carry-less multiplier is the ceiling of the SIMD paths.
 * Build: gcc -O2 clmul_tput.c -o clmul_tput */
#include <stdio.h>
#include <time.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
#define R(ins,r) ins " %%ymm15,%%ymm" #r ",%%ymm" #r "\n\t"
#define R12(ins) R(ins,0) R(ins,1) R(ins,2) R(ins,3) R(ins,4) R(ins,5) R(ins,6) R(ins,7) R(ins,8) R(ins,9) R(ins,10) R(ins,11)
#define X(ins,r) ins " %%xmm15,%%xmm" #r "\n\t"
#define X12(ins) X(ins,0) X(ins,1) X(ins,2) X(ins,3) X(ins,4) X(ins,5) X(ins,6) X(ins,7) X(ins,8) X(ins,9) X(ins,10) X(ins,11)
#define CL "xmm0","xmm1","xmm2","xmm3","xmm4","xmm5","xmm6","xmm7","xmm8","xmm9","xmm10","xmm11"
int main(void){
  long n=10000000; double t0,t;
  t0=now(); for(long i=0;i<n;i++) __asm__ volatile(R12("vpxor") ::: CL);
  t=(now()-t0)/(n*12.0); printf("ymm vpxor: %.3f ns/op\n",t*1e9);
  t0=now(); for(long i=0;i<n;i++) __asm__ volatile(R12("vpclmulqdq $0x11,") ::: CL);
  t=(now()-t0)/(n*12.0); printf("ymm vpclmulqdq: %.3f ns/op\n",t*1e9);
  t0=now(); for(long i=0;i<n;i++) __asm__ volatile(X12("pclmulqdq $0x01,") ::: CL);
  t=(now()-t0)/(n*12.0); printf("xmm legacy pclmulqdq: %.3f ns/op\n",t*1e9);
  t0=now(); for(long i=0;i<n;i++) __asm__ volatile(R12("vpmullw") ::: CL);
  t=(now()-t0)/(n*12.0); printf("ymm vpmullw: %.3f ns/op\n",t*1e9);
  return 0;}
