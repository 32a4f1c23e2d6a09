    .intel_syntax noprefix
    .text
    .globl fma_loop
fma_loop:
    vxorps ymm0, ymm0, ymm0
    vxorps ymm1, ymm1, ymm1
    vxorps ymm2, ymm2, ymm2
    vxorps ymm3, ymm3, ymm3
    vxorps ymm4, ymm4, ymm4
    vxorps ymm5, ymm5, ymm5
    vxorps ymm6, ymm6, ymm6
    vxorps ymm7, ymm7, ymm7
    vxorps ymm8, ymm8, ymm8
    vxorps ymm9, ymm9, ymm9
    vxorps ymm10, ymm10, ymm10
    vxorps ymm11, ymm11, ymm11
    vxorps ymm12, ymm12, ymm12
    vxorps ymm13, ymm13, ymm13
    mov rax, rdi
.Lloop:
    vfmadd231ps ymm0, ymm12, ymm13
    vfmadd231ps ymm1, ymm12, ymm13
    vfmadd231ps ymm2, ymm12, ymm13
    vfmadd231ps ymm3, ymm12, ymm13
    vfmadd231ps ymm4, ymm12, ymm13
    vfmadd231ps ymm5, ymm12, ymm13
    vfmadd231ps ymm6, ymm12, ymm13
    vfmadd231ps ymm7, ymm12, ymm13
    vfmadd231ps ymm8, ymm12, ymm13
    vfmadd231ps ymm9, ymm12, ymm13
    vfmadd231ps ymm10, ymm12, ymm13
    vfmadd231ps ymm11, ymm12, ymm13
    dec rdi
    jnz .Lloop
    vzeroupper
    ret
